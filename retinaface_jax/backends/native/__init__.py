"""Hand-written CPU kernels (C++ XLA FFI handlers), compiled on first use by ``backends.native.build``; the inference kernel plan and the CPU train step built on them."""
