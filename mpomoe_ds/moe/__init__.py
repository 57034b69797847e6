"""The MPOE MoE layer and its parts, on DeepSpeed's MoE contract.

Forward of :class:`~mpomoe_ds.moe.layer.MPOEMoE`: ``router`` (top-k routing,
balance loss) -> ``token_dispatcher`` (index dispatch, one all-to-all each
way) -> ``experts`` (batched MPO or plain experts, reconstruction from the
shared ``central`` tensors) -> combine. Around it: ``step`` (the MoE step
protocol a training loop talks to) and ``step_cache`` (once-per-step
reconstruction), ``grad_mask`` (the rank-consistent Bernoulli mask),
``params`` (parameter ownership and optimizer groups), ``config`` (the
``moe`` section).
"""
