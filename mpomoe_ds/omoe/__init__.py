"""OMoE: the orthogonal expert optimizer, and the expert-diversity metrics that show why.

Modules: ``config`` (the ``omoe`` section and its schedule), ``projector``
(the pure projector math), ``hooks`` (one layer's OMoE state, handed to its
experts as ``ExpertHooks``), ``optimizer`` (:class:`OrthogonalExpertOptimizer`:
phases, collectives, cost, checkpoint state; a participant of the MoE step
protocol :class:`mpomoe_ds.moe.step.MoEStep`), ``diversity`` (expert-similarity
metrics).
Router, attention, embeddings, central tensors' own optimizer state and
expert biases are not touched: they update normally.

Shape legend (suffixes):
    L  local experts of a layer (E / ep_size)      E  global experts
    I  input dim of a projected matrix (d_in: D for "up", F for "down")
    O  output dim of that matrix                     S  slots per expert (tokens incl. padding)
    K  optimizer steps recorded in an accumulating phase

The method. Expert matrices act as ``y = x @ W`` with ``W`` (I, O).

* Accumulating phase (``acc_steps`` ordinary optimizer steps). For every expert
  j and projected matrix, the mean input of the real tokens routed to j in
  the step, ``r`` (I,), is recorded. At the end of the phase it updates the
  expert's projector with the orthogonal-weight-modification (OWM) recursion::

      k = P r ;   P <- P - k k^T / (alpha + r^T k)          (P = I at the start)

  whose closed form, for the recorded inputs as the columns of ``A`` (I, K)
  and per-step ``alpha_t``, is::

      P = I - A (A^T A + diag(alpha))^{-1} A^T  =  (I + sum_t r_t r_t^T / alpha_t)^{-1}.

  ``P`` is symmetric with eigenvalue ``alpha / (s^2 + alpha)`` along a direction
  that carried input energy ``s^2``: ~0 on the inputs the expert has seen, 1
  on directions it never saw.

* Orthogonal phase (``orth_steps`` steps). Expert i's update is projected on
  its input dim with the mean projector of the *other* experts::

      P_bar_{-i} = (sum_j P_j - P_i) / (E - 1)   ;   G_i <- P_bar_{-i} G_i

  so for an input ``a`` seen by the other experts ``a^T (P_bar G_i) =
  (P_bar a)^T G_i ~ 0``: expert i's output on those inputs does not move.
  Caveat of the mean (the spec's choice): ``P_bar a ~ 0`` needs ``a`` to be
  seen by *every* other expert; a direction seen by only one of the E-1 others
  keeps (E-2)/(E-1) of its component. With E = 2, P_bar_{-i} = P_j exactly.

Where the projection acts (``projection``):

* ``"gradient"`` (default; warns for MPO experts, see ``"null_space"``): a tensor hook on
  the weight ``W_e`` the container reconstructs (MPO) or stacks (plain FFN)
  replaces its gradient by ``P_bar G``; autograd then carries it into the
  auxiliary cores, the shared central tensor, or the per-expert weights. The
  *gradient of W_e* is exactly orthogonal. The *applied* update is orthogonal
  only for plain experts under plain SGD (no momentum carried over from the
  accumulating phase, no weight decay): Adam's per-coordinate scaling
  ``m / sqrt(v)``, momentum and decoupled weight decay all break it, and for
  MPO experts the map cores -> W is multilinear, so even an SGD step on the
  cores changes W by ``J J^T (P_bar G) + O(lr^2)``, not by ``P_bar G``.
  Measured (tests/omoe/test_omoe.py, E = 2, ``||A^T dW|| / ||dW||`` over the other
  expert's unit inputs A; without OMoE in brackets): plain + SGD 3e-5 (0.52),
  plain + Adam 0.54 (0.62), MPO + SGD 0.50 (0.78), MPO + Adam 0.70 (0.69).
  So for MPO experts under Adam the projection shapes the gradient the
  optimizer sees, not the step it takes.
* ``"update"`` (plain "ffn" experts only): after the optimizer step, the
  change of each expert matrix is projected,
  ``W <- W_before + P_bar (W_after - W_before)``, so the applied update is
  exactly orthogonal whatever the optimizer (Adam, momentum, weight decay).
  It costs a copy of the projected expert matrices per step and writes the
  module's parameters: with ZeRO or fp16/bf16 the optimizer owns fp32 master
  weights that this write does not reach, so it is refused there
  (:func:`check_update_mode_supported`).

* ``"null_space"`` (MPO experts only; :mod:`mpomoe_ds.omoe.null_space`):
  after the optimizer step, the projected matrices' central tensors are put
  back (not stepped in orthogonal phases) and each expert's auxiliary-core
  step is corrected, by conjugate gradients on JVP / VJP of the
  reconstruction, so that the applied change of W_e is orthogonal to a
  basis Q_e of the other experts' protected inputs (the top eigenvectors of
  ``(E-1)(I - P_bar_{-i})``, so no collective beyond the phase switch's).
  Writes the module parameters and, under ZeRO 1/2 / bf16, the optimizer's
  fp32 master fragment. Leak ``||Q^T dW|| / ||dW||`` ~0.02 vs 0.5-0.7 without.

Communication. Projectors of the experts on other ranks are needed only
through ``sum_j P_j``: one SUM all-reduce over the expert-parallel group per
cycle, at the switch to the orthogonal phase, all layers and matrices in one
flat buffer. The recorded per-step input sums are reduced over the
expert-data-parallel group (ranks holding replicas of the same experts) in one
more all-reduce at the same moment, so every replica builds the same projector
from the global batch, exactly as a single process would. No collective runs
in forward, backward or any other step.

Naming conventions:
    projector        P_j, the OWM projector of one expert's inputs (I, I)
    mean projector   P_bar_{-i}, the mean of the other experts' projectors
    cycle            one accumulating phase followed by one orthogonal phase
    phase            "off" (before start_step / disabled), "accumulate", "orthogonal"
    step             the optimizer step counter the training loop passes in
"""
