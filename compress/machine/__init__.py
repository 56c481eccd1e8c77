"""The machine the pipeline runs on: its CPU, disk and memory, processes and signals."""
