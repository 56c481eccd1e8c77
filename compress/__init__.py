"""The library under the stage scripts: everything they share, grouped by idea.

The scripts beside this folder (split_dataset.py, train.py, pruner.py,
knowledge_distillation.py, test.py, export.py, sweep.py) turn flags into calls of
these modules; model.py, beside them, is the one model definition. Imports point one
way: this package never imports a script, and its modules import only those listed
above them here (tests/library/test_layout.py checks it, and that this map lists
every module).

    cli                    the command-line edge: one-line errors, exit statuses, shared flags
    machine.cpu            which CPU runs int8, and how its products are summed
    machine.resources      room on disk and in memory, writable folders, one run per output
    machine.processes      signals that stop us; other processes found and ended
    machine.distributed    processes under torchrun: joining, rank 0, adding up
    data.pictures          picture files, without torch: names, class folders, decoding one
    data.images            pictures in, batches out: transforms, the dataset, the seeded order
    checkpoints            what is on disk: the checkpoint format, atomic writes, safe loading
    data.splitting         a photo folder split into train/, val/ (and test/), source untouched
    pruning.weights        single weights zeroed (torch.nn.utils.prune), and what zeros buy
    measure.timing         how fast: timed runs, several models interleaved
    measure.intervals      how sure: an accuracy's interval, two models on the same pictures
    measure.evaluation     how good and how big: accuracy, confusion, FLOPs; a model's row
    export.onnx_files      exported files: their self-description, running them in onnxruntime
    measure.profiling      where a model's time goes, layer by layer, against the machine's peak
    measure.reporting      the tables printed and the figures saved
    export.convert         a checkpoint to fp32 and int8 ONNX, each checked before it is saved
    measure.comparison     several models measured side by side (test.py --compare)
    training.recipe        the settings of a training run, from the flags, saved whole
    training.tensorboard_log  a run's figures for TensorBoard, a sweep's settings beside them
    training.resume        what Ctrl-C saves and --resume restores, refused unless exact
    training.slimming      network slimming's sparsity term on the batch-norm scales
    training.loop          the training loop, Ctrl-C, mixed precision, the history
    training.pretrained    starting from ImageNet's weights or a file of yours
    pruning.channels       NNI's pruners and ModelSpeedup: a model that really shrinks
    pruning.latency        a VGG's time on this CPU from its widths, measured and fitted
    pruning.allocation     widths for a latency: what matters most per millisecond it costs
    training.teacher_store the teacher's logits of each training picture, computed once
    training.features      feature distillation: block outputs matched through 1x1 adapters
    training.distillation  a student learns from the dense teacher
    sweep.rules            the rules a sweep's choices follow: the budget, the front, halving
    sweep.targets          what a sweep decides by: a candidate as the file that would ship
    sweep.report           a sweep's table and figure, against the dense model
    sweep.decision         what a sweep decides: the pick within the budget, or what ships
    sweep.candidates       a sweep's candidates: their setup, measured together as they ship
    sweep.setting          one setting of a sweep, pruned and distilled from the teacher
    sweep.stepwise         iterative pruning: a sparsity reached in prune-then-distil steps
    sweep.halving          successive halving: every setting briefly, the promising for longer
    sweep.nni_halving      successive halving in an NNI experiment: the advisor that decides
    sweep.plain            the plain sweep: settings pruned, distilled, shipped, measured
    sweep.nni_config       the NNI experiment's configuration: the user's YAML, tuner, assessor
    sweep.nni_engine       NNI 3.0's experiment engine, and four mends of it
    sweep.experiment       the sweep as an NNI experiment: launched and followed
    sweep.trial            one trial of that experiment, as NNI runs it
    measure.result_page    what a photo run bought, for a person: RESULT.md and result.png
"""
