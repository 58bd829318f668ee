"""eqc compiler passes, one per module (shipped as `eqcompiler.passes`)."""
