"""The plan stage: the training cases' fingerprint, the rules that turn it into every `auto`
setting, the step-time probe."""
