"""Multiple-choice QA data: records, loaders, prompts, partitions, token ids."""
