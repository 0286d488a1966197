"""Training scripts: the MoE language model, routing traces and routing predictors."""
