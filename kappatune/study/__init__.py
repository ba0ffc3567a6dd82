"""Tools for running and analysing studies that compare fine-tuning selections."""
