"""Hand-written CPU kernels (C++ XLA FFI handlers), compiled on first use by ``kernels.native``."""
