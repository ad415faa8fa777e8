"""Serving on NVIDIA Triton Inference Server: model repositories, their validation, a PyTriton
server and a load test. Only ``model_facts``, ``triton_repo`` and ``validate`` run without the
``[serve]`` extra (validation needs ``tritonclient`` for Triton's own config schema); imports
among them run ``triton_repo -> validate -> model_facts``."""
