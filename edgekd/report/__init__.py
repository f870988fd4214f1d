"""Reports: the export folders' READMEs, the build summary and the HTML page."""
