"""kdutils: the helper package of the kd-without-ce notebooks (feature KD without cross-entropy).

Modules: data (datasets and device-resident batches), models (model factory), layers (generalized layers and
forward-hook taps), train (seeding, fit, checkpoints), geometry and kq (layer geometry and knowledge quality),
distill (CE-free feature KD and baselines), plots, pipeline (presets, manifests, papermill runner).
"""
__version__ = "0.1.0"
