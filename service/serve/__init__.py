"""`dgemma serve` as a process: configuration from NIM_* variables, and the supervisor of Triton and the front."""
