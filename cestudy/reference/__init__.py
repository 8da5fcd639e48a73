"""What kernels are measured against: the extended-precision oracle, the baseline
formulations written in numpy, and the peers (torch, scipy)."""
