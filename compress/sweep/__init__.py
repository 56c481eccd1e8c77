"""The sweep: settings pruned, distilled and shipped, measured together, the pick; in this
process or as an NNI experiment."""
