"""Jobs: the row is the truth, a queue only wakes a worker."""
