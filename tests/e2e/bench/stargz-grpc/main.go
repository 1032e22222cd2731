// containerd-stargz-grpc for the cold-start benchmark (scripts/bench-coldstart.sh): stargz-snapshotter's
// filesystem and snapshotter packages (Debian's golang-github-containerd-stargz-snapshotter-dev, which ships
// the library but not upstream's cmd/containerd-stargz-grpc) served as a containerd proxy snapshotter on a
// unix socket. Built offline by tests/e2e/bench/peers.sh with GO111MODULE=off GOPROXY=off against
// /usr/share/gocode. newSnapshotter is upstream's service.NewStargzSnapshotterService without the CRI
// parts: that package imports k8s.io/cri-api, which Debian does not ship. Upstream's main also has a
// FUSE-manager mode, systemd socket activation, metrics and keychains; the benchmark needs none of them.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay/overlayutils"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	fsconfig "github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/layer"
	"github.com/containerd/stargz-snapshotter/fs/source"
	snbase "github.com/containerd/stargz-snapshotter/snapshot"
	rhttp "github.com/hashicorp/go-retryablehttp"
	"github.com/pelletier/go-toml"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "unix socket to serve the snapshotter on")
	root := flag.String("root", "/var/lib/containerd-stargz-grpc", "state directory")
	configPath := flag.String("config", "", "TOML config (upstream's config.toml keys); empty: defaults")
	logLevel := flag.String("log-level", "info", "logrus level")
	flag.Parse()
	if err := run(*address, *root, *configPath, *logLevel); err != nil {
		fmt.Fprintf(os.Stderr, "containerd-stargz-grpc: %v\n", err)
		os.Exit(1)
	}
}

func run(address, root, configPath, logLevel string) error {
	lvl, err := logrus.ParseLevel(logLevel)
	if err != nil {
		return fmt.Errorf("--log-level %q: %w", logLevel, err)
	}
	logrus.SetLevel(lvl)
	ctx := log.WithLogger(context.Background(), log.L)

	var config fsconfig.Config
	if configPath != "" {
		tree, err := toml.LoadFile(configPath)
		if err != nil {
			return fmt.Errorf("reading %s: %w", configPath, err)
		}
		if err := tree.Unmarshal(&config); err != nil {
			return fmt.Errorf("parsing %s: %w", configPath, err)
		}
	}
	if err := os.MkdirAll(root, 0700); err != nil {
		return err
	}
	rs, err := newSnapshotter(ctx, root, config)
	if err != nil {
		return fmt.Errorf("snapshotter: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(address), 0700); err != nil {
		return err
	}
	if err := os.RemoveAll(address); err != nil {
		return err
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return fmt.Errorf("listen %s: %w", address, err)
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(rs))
	done := make(chan error, 1)
	go func() { done <- rpc.Serve(l) }()
	log.G(ctx).WithField("address", address).Info("serving")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case err := <-done:
		return err
	case s := <-sig:
		log.G(ctx).Infof("%v: stopping", s)
	}
	rpc.Stop()
	// Close unmounts the layers' FUSE filesystems.
	return rs.Close()
}

// newSnapshotter: upstream's service.NewStargzSnapshotterService with layer sources from containerd's default
// labels only (what `ctr-remote image rpull` sets) and anonymous access to the registry.
func newSnapshotter(ctx context.Context, root string, config fsconfig.Config) (snapshots.Snapshotter, error) {
	snRoot := filepath.Join(root, "snapshotter")
	userxattr, err := overlayutils.NeedsUserXAttr(snRoot)
	if err != nil {
		log.G(ctx).WithError(err).Warnf("cannot detect whether \"userxattr\" is needed, assuming %v", userxattr)
	}
	opq := layer.OverlayOpaqueTrusted
	if userxattr {
		opq = layer.OverlayOpaqueUser
	}
	fs, err := stargzfs.NewFilesystem(filepath.Join(root, "stargz"), config,
		stargzfs.WithGetSources(source.FromDefaultLabels(registryHosts)), stargzfs.WithOverlayOpaqueType(opq))
	if err != nil {
		return nil, fmt.Errorf("filesystem: %w", err)
	}
	return snbase.NewSnapshotter(ctx, snRoot, fs, snbase.AsynchronousRemove)
}

// registryHosts: upstream's resolver.RegistryHostsFromConfig with no mirrors and no credentials (the
// benchmark's registry is local, without auth): plain http for localhost, https otherwise.
func registryHosts(ref reference.Spec) ([]docker.RegistryHost, error) {
	// A retrying client as upstream's: stargz's fetcher configures its retries through the transport.
	retrying := rhttp.NewClient()
	retrying.Logger = nil
	client := retrying.StandardClient()
	client.Timeout = 30 * time.Second
	host := docker.RegistryHost{
		Client:       client,
		Host:         ref.Hostname(),
		Scheme:       "https",
		Path:         "/v2",
		Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
		Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(client)),
	}
	if local, _ := docker.MatchLocalhost(host.Host); local {
		host.Scheme = "http"
	}
	return []docker.RegistryHost{host}, nil
}
