"""Benchmarks: each module's ``run()`` measures one stage and returns ratios from one run."""
