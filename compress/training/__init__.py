"""Training a model: its recipe, the loop, pretrained weights, and distillation from a teacher."""
