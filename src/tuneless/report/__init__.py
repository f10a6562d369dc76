"""Tables and plots, made from results only (traces or the results store); nothing here runs."""
