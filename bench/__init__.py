"""Benchmarks for numlstm: ``python -m bench`` (CPU against torch.nn.LSTM, see bench/cpu.py)
and ``python bench/startup.py`` (a new process's first result).

Importing this package imports nothing else, so that bench/cpu.py can size the thread pools
before NumPy, Numba and torch start.
"""
