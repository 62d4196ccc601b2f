use super::*;

#[test]
fn bad_layouts_are_refused() {
    let mib = 1u64 << 20;
    let cases: &[(u64, u64, u32, &str)] = &[
        (DEFAULT_RAM_BASE, 0, 1, "empty"),
        (DEFAULT_RAM_BASE + 4096, 64 * mib, 1, "unaligned base"),
        (DEFAULT_RAM_BASE, 64 * mib + 4096, 1, "unaligned size"),
        (0, 64 * mib, 1, "overlaps boot"),
        (BOOT_SIZE, 1 << 30, 1, "overlaps hole"),
        (DEFAULT_RAM_BASE, MAX_MAPPED_END, 1, "too high"),
        (!(HUGE_PAGE_SIZE - 1), HUGE_PAGE_SIZE, 1, "overflow"),
        (DEFAULT_RAM_BASE, 64 * mib, 0, "no vcpus"),
        (DEFAULT_RAM_BASE, 64 * mib, MAX_VCPUS + 1, "too many vcpus"),
    ];
    for &(base, size, vcpus, what) in cases {
        assert!(
            BootLayout::new(base, size, vcpus).is_err(),
            "{what}: got Ok, want an error"
        );
    }
    let ok = BootLayout::new(DEFAULT_RAM_BASE, 64 << 30, MAX_VCPUS).unwrap();
    assert_eq!(ok.mapped_end(), 65 << 30);
    assert!(ok.stack_pointer(MAX_VCPUS).is_err());
}

#[test]
fn identity_map_covers_ram_and_hole() {
    let l = BootLayout::new(DEFAULT_RAM_BASE, 6 << 30, 1).unwrap();
    let img = l.boot_image(&[0x90]).unwrap();
    let pd = &img.iter().find(|(gpa, _)| *gpa == PD_GPA).unwrap().1;
    assert_eq!(
        pd.len() as u64,
        7 * 4096,
        "7 GiB mapped: got {} PD bytes",
        pd.len()
    );
    let entry = |gpa: u64| {
        let i = (gpa / HUGE_PAGE_SIZE) as usize * 8;
        u64::from_le_bytes(pd[i..i + 8].try_into().unwrap())
    };
    for gpa in [
        0,
        HOLE_GPA,
        DEFAULT_RAM_BASE,
        DEFAULT_RAM_BASE + (6 << 30) - 1,
    ] {
        assert_eq!(
            entry(gpa),
            (gpa & !(HUGE_PAGE_SIZE - 1)) | 0x87,
            "gpa {gpa:#x}"
        );
    }
    assert!(l.boot_image(&vec![0; CODE_MAX_SIZE as usize + 1]).is_err());
}
