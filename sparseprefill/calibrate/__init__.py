"""Calibration: the offline profiler that finds each head's pattern and budget on real activations
(``sparseprefill profile``). It sits above the integration: it runs patched models through
``patchers.observe_prefill`` and uses the evals' prompts."""
