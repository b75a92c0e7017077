"""Schedules per target: rules that pick a loop structure per kernel kind."""
