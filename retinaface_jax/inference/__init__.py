"""Inference: ``Detector`` / ``Face`` (detector.py, face.py), input normalisation and resize rules
(preprocess.py), size buckets (buckets.py) with exact padding (padding.py), jitted decode/top-k and
exact NMS (postprocess.py), alignment (align.py), drawing (draw.py), video I/O (video.py), the
persistent compilation cache (compile_cache.py) and the ``detect.py`` CLI (cli.py)."""
