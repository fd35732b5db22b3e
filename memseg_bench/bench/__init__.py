"""Speed and memory benchmarks (`memseg bench ...`): training steps (train.py), the contrastive
term and bank update (loss.py), inference (infer.py). Their `--preset` names are the config
presets' (memseg_bench/presets/)."""
