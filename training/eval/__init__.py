"""Benchmarks: dataset readers, the shared runner, summaries and one CLI per benchmark.

- `training.eval.roborefit`  RoboRefIt testA/testB (mask mIoU, the paper's 82.5 / 74.4)
- `training.eval.inst2seg`   Inst2Seg bench (instance mAP, gIoU; single/multi/no-target)
- `training.eval.reasonseg`  ReasonSeg (gIoU, cIoU; short/long)
- `training.eval.grefcoco`   gRefCOCO (instance mAP, cIoU, gIoU, N-acc, T-acc)

Metrics live in `training.metrics`; see docs/evaluation.md for the formats read
and every protocol choice.
"""
