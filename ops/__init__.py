"""What operators run and read: the lag monitor and `tidegate lag`."""
