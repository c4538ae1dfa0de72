"""The limits the ledger contract enforces, in one place.

The contract (``ledger.FedLedgerContract``) refuses a record outside these bounds, so the
gateway's validator, the task spec and the wire checks use the same constants: nothing the
gateway accepts can then be refused when its round is anchored (a refusal there is permanent:
every retry fails the same way).
"""

from __future__ import annotations

#: Highest round number a task can reach (rounds are numbered from 0).
MAX_ROUND = 99_999_999
#: Largest sample count of one update (a signed 32-bit integer, as Fabric clients expect).
MAX_SAMPLES = 2**31 - 1
#: Round metrics (accuracy, clinical metrics...) per round record.
MAX_METRICS = 32
#: Classes up to which a round records each class's recall (``recall_<k>``); a task with
#: more records none (its balanced accuracy still averages them all). The largest record then
#: stays within MAX_METRICS: accuracy, balanced accuracy and AUC (3), 16 recalls, a DP task's 5,
#: FedBuff's 2 and a robust rule's 2 make 28.
MAX_CLASS_RECALLS = 16
#: Update records per RecordUpdates batch.
MAX_BATCH_RECORDS = 1_000
#: RecordUpdates batches per round.
MAX_BATCHES = 10_000
