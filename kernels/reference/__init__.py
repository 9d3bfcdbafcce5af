"""Token-by-token reference of the GKA operator: the test oracle (float64-capable, optionally exact solve)."""
from .recurrence import gka_naive, recurrent_step
from .implicit_grad import gka_naive_implicit_grads

__all__ = ['gka_naive', 'recurrent_step', 'gka_naive_implicit_grads']
