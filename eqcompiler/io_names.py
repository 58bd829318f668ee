"""Names of the graph inputs and outputs an eqc artifact carries state through, shared by export, the passes
that add state and the runtime that feeds it back: past_key_values.* in, present.* out."""
PAST, PRESENT = "past_key_values.", "present."
# quantize_activations_ema's running activation scales, carried step to step like the cache but not cache.
STATE_PAST, STATE_PRESENT = PAST + "act_ema.", PRESENT + "act_ema."
