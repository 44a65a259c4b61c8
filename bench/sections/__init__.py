"""The sections of bench/run.py, one module each; bench/run.py is the command line that picks them.

  ceiling  the machine's matmul rate per framework and precision (table 1)
  step     throughput, MFU, the step split, trichip against a hand-written loop (hand.py), the whole loop
           against its backend (tables 2a, 2b, 3a, 3b)
  ckpt     checkpoint save/load, async save, where a save goes, writers side by side (tables 4a-4d)
  scale    launch.train subprocesses over devices / processes, and step time against model size (5a, 5b)

common.py holds the report and the helpers they share; machine.py the header of a written report.
"""
