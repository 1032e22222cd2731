//! Devices: release, cleanup and orphans, through the fake `DeviceOps`.

use super::*;

#[test]
fn cleanup_frees_devices_whose_release_failed() {
    use std::sync::atomic::Ordering::SeqCst;
    let (_d, mut s) = snapshotter();
    let ops = fake_ops(&mut s);
    let gone = with_writable_device(&s, &ops, "gone", 41);
    let live = with_writable_device(&s, &ops, "live", 42);

    // Something still uses the removed container's filesystem: Remove cannot unmount it.
    ops.busy.store(true, SeqCst);
    s.remove("gone").unwrap();
    assert!(ops.stopped.lock().unwrap().is_empty());
    assert_eq!(held_devices(&s), BTreeSet::from([41, 42]));

    // Cleanup frees it, with a lazy unmount as the last resort; the live one stays.
    s.cleanup().unwrap();
    assert_eq!(*ops.stopped.lock().unwrap(), vec![41]);
    assert_eq!(
        *ops.lazy_unmounts.lock().unwrap(),
        vec![s.dir(gone.id).join("block/mountpoint")]
    );
    assert_eq!(held_devices(&s), BTreeSet::from([42]));
    assert!(!s.cfg.root.join("devices/41").exists());
    assert!(s.cfg.root.join("devices/42").exists());
    assert!(!s.dir(gone.id).exists() && s.dir(live.id).exists());

    // A device whose stop fails is kept until a stop works, and so is its directory.
    ops.busy.store(false, SeqCst);
    ops.failing_stops.store(2, SeqCst);
    s.remove("live").unwrap();
    s.cleanup().unwrap();
    assert_eq!(held_devices(&s), BTreeSet::from([42]));
    assert!(s.dir(live.id).exists());
    s.cleanup().unwrap();
    assert_eq!(*ops.stopped.lock().unwrap(), vec![41, 42]);
    assert!(held_devices(&s).is_empty());
    assert!(!s.cfg.root.join("devices/42").exists());
    assert!(!s.dir(live.id).exists());
}

#[test]
fn cleanup_frees_a_shared_device_whose_release_failed() {
    use std::sync::atomic::Ordering::SeqCst;
    let (_d, mut s) = snapshotter();
    let ops = fake_ops(&mut s);
    local_overlaybd_layer(&s, "img");
    let img = s.meta.get("img").unwrap();
    // A view on the image, served by its shared device 43.
    let view = s
        .meta
        .create(
            "v",
            "img",
            Kind::View,
            BTreeMap::new(),
            |d| -> SnapResult<Snapshot> { Ok(d.clone()) },
        )
        .unwrap();
    let mountpoint = s.dir(img.id).join("block/mountpoint");
    ops.mounted.lock().unwrap().insert(mountpoint.clone());
    let dev = AttachedDevice::without_server(43);
    s.own_device(43, Some(dev.identity()));
    s.lock().shared.insert(
        img.id,
        Arc::new(Mutex::new(Some(SharedDevice {
            dev,
            mountpoint,
            users: BTreeSet::from([view.id]),
        }))),
    );
    ops.failing_stops.store(1, SeqCst);
    s.remove("v").unwrap();
    assert_eq!(held_devices(&s), BTreeSet::from([43]));
    // Cleanup passes over a device someone is busy with (a Prepare attaching it).
    let s = Arc::new(s);
    let slot = s.lock().shared[&img.id].clone();
    let busy = slot.lock().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    {
        let s = s.clone();
        std::thread::spawn(move || done_tx.send(s.cleanup().is_ok()));
    }
    // A hang guard only: Cleanup never waits for a busy device.
    assert_eq!(done_rx.recv_timeout(Duration::from_secs(20)), Ok(true));
    assert!(ops.stopped.lock().unwrap().is_empty());
    drop(busy);
    s.cleanup().unwrap();
    assert_eq!(*ops.stopped.lock().unwrap(), vec![43]);
    assert!(held_devices(&s).is_empty());
    assert!(!s.cfg.root.join("devices/43").exists());
}

#[test]
fn orphan_devices_are_deleted_only_while_still_ours() {
    let (_d, mut s) = snapshotter();
    let ops = fake_ops(&mut s);
    let ours = device::DeviceIdentity {
        pid: 4000,
        sectors: 1 << 20,
    };
    let devices = s.cfg.root.join("devices");
    std::fs::create_dir_all(&devices).unwrap();
    let record = |id: u32, text: &str| std::fs::write(devices.join(id.to_string()), text).unwrap();
    let json = serde_json::to_string(&ours).unwrap();
    let mut ids = ops.identities.lock().unwrap();
    // 1: ours, its server gone: the driver still names our old server and our size.
    record(1, &json);
    ids.insert(1, ours);
    // 2 and 3: ids another program's devices got after a restart.
    record(2, &json);
    ids.insert(2, device::DeviceIdentity { pid: 5000, ..ours });
    record(3, &json);
    ids.insert(3, device::DeviceIdentity { sectors: 8, ..ours });
    // 4: gone.
    record(4, &json);
    // 5: a record that tells nothing (an older ovbd's): the device is left alone.
    record(5, "");
    ids.insert(5, ours);
    // 6: recorded as attach records it, and still ours.
    s.own_device(6, Some(ours));
    ids.insert(6, ours);
    // 7: exists, but we released it (no record): another program may have it now.
    ids.insert(7, ours);
    drop(ids);
    // Those are the devices a snapshot may recover too (an older ovbd's record as before).
    let recoverable: Vec<u32> = (1..=7).filter(|&id| s.still_ours(id)).collect();
    assert_eq!(recoverable, vec![1, 5, 6]);
    s.delete_orphan_devices();
    let mut deleted = ops.deleted.lock().unwrap().clone();
    deleted.sort();
    assert_eq!(deleted, vec![1, 6]);
    // No record stays: the devices left alone are not ours any more, or cannot be told.
    assert_eq!(std::fs::read_dir(&devices).unwrap().count(), 0);
}
