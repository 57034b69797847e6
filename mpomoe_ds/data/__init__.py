"""Data: everything between a data config and the tensors a training or evaluation step consumes.

Modules, in pipeline order:

1. ``config``: ``DataConfig`` / ``TaskEntry``: which tasks, where their data
   lives (local csv/tsv/json/jsonl/parquet files, a hub data set, or the
   embedded ``builtin`` ``toy_glue`` / ``toy_lm``), sequence length, sampling
   temperature, seed; ``tasks``: the task registry and its metrics.
2. ``loading``: each task's raw splits, validated early with errors that name
   the file/task/column and the fix (``DataError``).
3. ``tokenize``: ``prepare_tasks`` tokenizes every task once into padded arrays.
4. ``sampling``: ``TrainBatches``, this rank's infinite stream of single-task
   training batches, mixed across tasks by temperature sampling, resumable.
5. ``eval``: ``eval_batches`` + ``gather_eval``: every validation example
   exactly once across ranks, in full-shape batches with a mask.

Pretraining corpora take another road: ``prepare`` tokenizes a corpus once
into token shards (``mpomoe-prepare``; local files, or a data set streamed by
``hub_source``), ``corpus`` reads (on demand) and packs them into
fixed-length sequences, ``mixture`` mixes corpora per sample into one global
sample sequence that does not depend on the world size. Corpora listed
together with tasks become whole-micro-batch sources of the ``sampling``
stream instead (one task per micro-batch, as the multi-task model needs).

The distributed contract (why it looks like this). DeepSpeed's MoE layer
exchanges tokens with an all-to-all whose sizes come from the local batch, so
every rank must run a batch of the *same shape* at the same step, or the
collective hangs. Hence:

- every sequence is padded to exactly ``max_seq_len`` (no dynamic padding);
- every rank yields the same number of batches of ``batch_size`` rows;
- the task of step s depends only on (seed, s), never on the rank, so all
  ranks pick the same task (and task head) at the same step;
- eval pads the last batches with masked dummy rows instead of shrinking them.

Every rank loads and tokenizes all tasks (the data sets this targets fit in
memory: token ids are int32, masks int8) and then reads its own disjoint
shard; nothing is exchanged to build batches.

Shape legend: N examples in a split, L = max_seq_len, B = per-rank micro-batch
(DeepSpeed's ``train_micro_batch_size_per_gpu``), W = data-parallel world
size, G = B * W global batch, K tasks, M eval rows on one rank (with padding).
"""
