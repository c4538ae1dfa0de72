from fedledger._entry import main

main()
