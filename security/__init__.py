"""Threat detection: ``manage.py security_scan`` finds attacks and weak database posture."""
