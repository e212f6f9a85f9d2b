"""Pure-XLA formulations of the convolutions and per-channel reductions, with the VJPs that
XLA's CPU backend needs to be fast."""
