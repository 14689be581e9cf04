"""The kubernetes backend: the pod end as a Deployment behind a UDP Service in a real cluster.

Modules: ``options`` (what it is told), ``client`` (API calls with deadlines), ``manifests``
(objects rendered from ``manifests/``), ``objects`` (creating and reading a run's objects),
``podstate`` (pods, container by container), ``cleanup`` (deleting a run's objects) and
``backend`` (the Backend itself). Nothing is imported here, so that the options load without
the Kubernetes client.
"""
