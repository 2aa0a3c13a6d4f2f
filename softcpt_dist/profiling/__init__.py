"""Measuring training steps: ``softcpt-dist profile`` (time split, FLOPs, MFU, memory: ``step_profile.py``)
and ``softcpt-dist scaling`` (profiles over world sizes, model sizes and class counts, as CSV and plots:
``scaling_study.py``). ``phases.py`` is light: the model and the loop import its no-op timer."""
