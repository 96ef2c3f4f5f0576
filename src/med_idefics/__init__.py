"""med-idefics: Med-VQA fine-tuning of Idefics2, reproducibly."""
