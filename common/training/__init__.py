"""The training core: local DP-SGD and plain training loops, the tasks, and their evaluation.

Sites (`client/`), the aggregator's central evaluation (`server/`), simulations and the
benchmarks all train and evaluate through this package, so a deployed round and a simulated round
run the same code. It imports no `flwr` (tests/test_import_contracts.py checks it).
"""
