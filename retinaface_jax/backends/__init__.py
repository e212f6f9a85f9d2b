"""How the model is executed fast, beside the reference model in ``retinaface_jax.models``.

``native``: our C++ CPU kernels (XLA FFI), their build, the inference kernel plan and the CPU
train step's fused layers. ``xla_cpu``: pure-XLA formulations (and their VJPs) that XLA's CPU
backend needs.
"""
