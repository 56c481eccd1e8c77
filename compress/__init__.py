"""The library under the stage scripts: everything they share, a module per question.

The scripts beside this folder (split_dataset.py, train.py, pruner.py,
knowledge_distillation.py, test.py, export.py, sweep.py) turn flags into calls of
these modules; model.py, beside them, is the one model definition. Imports point one
way: this package never imports a script, and its modules import only those listed
above them here (tests/library/test_layout.py checks it).

    cli            the command-line edge: one-line errors, exit statuses, shared flags
    cpu            which CPU runs int8, and how its products are summed
    machine        room on disk and in memory, writable folders, one run per output
    distributed    processes under torchrun: joining, rank 0, adding up
    data           pictures in, batches out: decoding, transforms, the seeded order
    checkpoints    what is on disk: the checkpoint format, atomic writes, safe loading
    splitting      a photo folder split into train/ and val/, never touching the source
    timing         how fast: timed runs, several models interleaved
    evaluation     how good and how big: accuracy, confusion, FLOPs
    onnx_files     exported files: their self-description, running them in onnxruntime
    profiling      where a model's time goes, layer by layer, against the machine's peak
    reporting      the tables printed and the figures saved
    deployment     shipping: fp32 and int8 ONNX, each checked before it is saved
    comparison     several models measured side by side (test.py --compare)
    training       the training loop, Ctrl-C and --resume, the shared Recipe
    pretrained     starting from ImageNet's weights or a file of yours
    pruning        NNI's pruners and ModelSpeedup: a model that really shrinks
    teacher_store  the teacher's logits of each training picture, computed once
    distillation   a student learns from the dense teacher
    shipping       a candidate as the file that would ship, in its runtime
    candidates     a sweep's candidates: their setup, measured together, the pick
    search         the plain sweep: settings pruned, distilled, shipped, measured
    processes      signals that stop us; other processes found and ended
    nni_engine     NNI 3.0's experiment engine, and four mends of it
    experiment     the sweep as an NNI experiment: launched and followed
    trial          one trial of that experiment, as NNI runs it
"""
