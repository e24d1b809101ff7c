"""KoBEST few-shot evaluation."""
