"""Transfer of a pretrained model: fine-tuning with transformers' `Trainer` (`finetune`, with its options and data),
linear probes on frozen features (`linear_probe`) and learned prompts for zero-shot classification
(`prompt_learning`)."""
