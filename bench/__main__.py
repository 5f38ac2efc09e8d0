"""``python -m bench``: numlstm's CPU backend against torch.nn.LSTM (see bench/cpu.py)."""

from bench.cpu import main

main()
