"""A real Kubernetes cluster on this host, for end-to-end tests.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler run in the root network namespace on loopback;
two nodes, each a lab node namespace with containerd, the real kubelet and kube-proxy, sit behind the lab's WAN
router; a load-balancer controller plays the cloud. ``cluster.running_cluster`` starts and stops all of it.
"""
