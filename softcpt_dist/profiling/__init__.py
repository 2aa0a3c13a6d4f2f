"""Measuring training steps: ``softcpt-dist profile`` (time split, FLOPs, MFU, memory: ``step_profile.py``)
and ``softcpt-dist scaling`` (profiles over world sizes, model sizes and class counts, as CSV and plots:
``scaling_study.py``). Their phase timer is ``softcpt_dist/step_phases.py``, below the model and the loop,
which hold its no-op timer."""
