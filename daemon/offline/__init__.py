"""Offline jobs: a crash-safe queue (SQLite) and worker processes behind the control
socket, and the job kinds that run in them (CT volumes, whole-slide images)."""
