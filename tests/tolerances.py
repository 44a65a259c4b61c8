"""How close two computations that should agree must be: every bound in one place, with its measured gap.

Each bound is the largest gap measured on the CPU (float32, small models) times a stated margin, and
sits well below the gap that a small semantic error makes, so the tests it guards fail on such an
error (bench/mutants.py runs those errors; bench/MUTANTS.md has its last table). The tests print each
gap beside its bound (`pytest -s`).

LOSS_RTOL = 5e-6: the largest relative gap between two loss curves of one training run computed two ways.
  Measured at most 3.4e-7 (a margin of 15x; earlier runs reached 6e-7, 8x): JAX against PyTorch over 100
  steps, loss 3.4e-7 and eval loss 1.6e-7, and the handovers at step 50 both ways 2.4e-7 and 2.6e-7
  (tests/test_parity.py); 8 JAX devices on four meshes and 2 JAX processes against one device 3.4e-7, FSDP2
  over 2 processes (plain and hybrid) 2.1e-7, 8 JAX devices handing over to 2 torch processes and back
  2.1e-7, activation checkpointing 1.0e-7 (tests/test_scale.py); a run killed on s3 and resumed on the
  other framework 2.3e-7 (tests/test_object_store.py). The gaps that the earlier bound 1e-4 let through:
  torch's weight decay 0.11 instead of 0.1 (7e-5), AdamW's eps doubled on one framework (5e-5).
  Tensor parallelism on 4 gloo processes (tests/test_tensor_parallel.py) measured up to 3.3e-6 (a margin of
  1.5x): data 2 x tensor 2 with the vocabulary split, one spike at step 28 that a 4-process fsdp run without a
  tensor axis shows at the same step (that batch's reduction order, not the tensor layout); fsdp 2 x tensor 2
  1.4e-6, its hand-over to JAX and back 1.1e-6 and 1.4e-6.

GRADIENT_RTOL = 5e-6: a backend's gradient against torch autograd's on the same rows computed at once (and
  micro-batches accumulated against one batch), per tensor as max |g - g_ref| / max |g_ref|.
  Measured at most 7.4e-7 (JAX) and 4.0e-7 (torch) (tests/test_optimizer_reference.py): a margin of 7x.
  A sum of micro-batch gradients where the mean is due is off by 1.

OPTIMIZER_RTOL = 1e-6: one optimizer update of a backend against the NumPy reference of the documented
  semantics on the backend's own gradient (tests/test_optimizer_reference.py), per element:
  |delta - delta_ref| <= OPTIMIZER_RTOL * (the size of the terms the update sums) + 2 float32 roundings of
  the parameter; and the moments, per tensor relative to their largest element.
  Measured at most 3.3e-7 (updates) and 1.2e-7 (moments): a margin of 3x, float32 arithmetic's own
  error being ~1e-7. Weight decay 0.11 for 0.1 is off by 0.1 (on embedding rows without gradient, where
  the decay is the whole update), a doubled eps by 0.2 (at step 1, where |g| ~ eps).
"""

LOSS_RTOL = 5e-6
GRADIENT_RTOL = 5e-6
OPTIMIZER_RTOL = 1e-6
