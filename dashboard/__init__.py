"""The dashboard of a line: a metrics consumer of its streams (river statistics, drift alarms,
rolling ROC AUC against operator verdicts), a web page with live charts and a gallery of the
latest anomalies, a JSON API and Prometheus metrics, served by `glad dashboard`."""
