"""The offline demo and the machinery tests and benchmarks share: generated archives and a loopback file server.

Nothing in flows/, tasks/ or storage/ imports from here; the command line does, for `notmnist demo`
and `notmnist make-archives`.
"""
