"""fedledger: the command line and the single-machine demo that tie the components together.

The components themselves live in ``fedcore``, ``edge_agent``, ``gateway`` and ``ledger``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
