"""Quality and speed evaluation: datasets, metrics, the eval loop and the TTFT benchmark."""
